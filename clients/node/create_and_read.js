#!/usr/bin/env node
// Proves that a client in another language can use the orders.v1 API from
// nothing but our .proto files.
//
//   node create_and_read.js WRITE_ADDRESS READ_ADDRESS
//   node create_and_read.js 127.0.0.1:50051 127.0.0.1:50052
//
// Steps, each RPC with a deadline:
//   1. OrderCommands.CreateOrder  (customer "node-client", currency EUR)
//   2. OrderCommands.AddItem      (2 units at 1.50 EUR)
//   3. OrderQueries.GetOrder      with AddItem's consistency_token, so the read
//      service waits until its views include that write (read-your-writes);
//      the answer must not be stale and must show version 2, PENDING, total 300.
//   4. OrderCommands.CreateOrder  with currency "euro": must fail with
//      INVALID_ARGUMENT and carry the rich status (google.rpc.Status) in the
//      `grpc-status-details-bin` trailer, with a BadRequest violation naming
//      currency_code.
//
// On success it prints one JSON line with what it observed and exits 0; on any
// failure it prints the failure (and what it observed so far) to stderr and
// exits 1. Wrong arguments: usage on stderr, exit 2.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// Every RPC gets its own deadline this far in the future. GetOrder with a
// consistency token may legitimately wait for the views, so keep it generous.
const DEADLINE_MS = 10_000;

// Our protos, loaded at runtime (no code generation). includeDirs is the root
// that the imports ("orders/v1/types.proto") are relative to; the well-known
// types (google/protobuf/timestamp.proto) come with proto-loader itself.
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto (order_id, not orderId)
  longs: String, // int64 arrives as a decimal string: exact, no float rounding
  enums: String, // enums arrive by name ("ORDER_STATUS_PENDING")
  defaults: true, // unset proto3 fields appear with their default (stale: false)
  includeDirs: [PROTO_ROOT],
};

function loadOrdersApi() {
  const definition = protoLoader.loadSync(
    ['orders/v1/commands.proto', 'orders/v1/queries.proto'],
    LOADER_OPTIONS,
  );
  return grpc.loadPackageDefinition(definition).orders.v1;
}

// google.rpc.Status and the detail messages our server sends, for decoding the
// `grpc-status-details-bin` trailer. Their .proto files (googleapis) are not
// shipped with grpc-js or proto-loader, so the few fields we read are declared
// here in protobuf.js JSON form, with the same field numbers as
// google/rpc/status.proto and google/rpc/error_details.proto. proto-loader only
// builds (de)serializers for RPC methods, hence the `Decoder` service: it is
// never called, its methods just give us `responseDeserialize` functions.
const RPC_TYPES_JSON = {
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: {
              fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } },
            },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: {
                    field: { type: 'string', id: 1 },
                    description: { type: 'string', id: 2 },
                  },
                },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            Decoder: {
              methods: {
                Status: { requestType: 'Status', responseType: 'Status' },
                BadRequest: { requestType: 'BadRequest', responseType: 'BadRequest' },
                ErrorInfo: { requestType: 'ErrorInfo', responseType: 'ErrorInfo' },
              },
            },
          },
        },
      },
    },
  },
};
const rpcDecoder = protoLoader.fromJSON(RPC_TYPES_JSON, LOADER_OPTIONS)['google.rpc.Decoder'];

// Decodes a google.rpc.Status, and inside it the BadRequest and ErrorInfo details.
function decodeStatusDetails(buffer) {
  const status = rpcDecoder.Status.responseDeserialize(buffer);
  const decoded = { code: status.code, message: status.message, field_violations: [], reasons: [] };
  for (const detail of status.details) {
    const typeName = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.BadRequest') {
      const badRequest = rpcDecoder.BadRequest.responseDeserialize(detail.value);
      decoded.field_violations.push(...badRequest.field_violations.map((v) => v.field));
    } else if (typeName === 'google.rpc.ErrorInfo') {
      decoded.reasons.push(rpcDecoder.ErrorInfo.responseDeserialize(detail.value).reason);
    }
  }
  return decoded;
}

// A unary call as a promise, always with a deadline. Rejects with grpc-js's
// ServiceError, whose `metadata` holds the call's trailers.
function call(client, method, request) {
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

// Name of a numeric gRPC status code, e.g. 3 -> "INVALID_ARGUMENT".
function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

class CheckFailed extends Error {}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

async function run(api, writeAddress, readAddress, observed) {
  const credentials = grpc.credentials.createInsecure();
  const commands = new api.OrderCommands(writeAddress, credentials);
  const queries = new api.OrderQueries(readAddress, credentials);
  try {
    // 1. Create an order; the server generates its id.
    const created = await call(commands, 'CreateOrder', {
      customer_id: 'node-client',
      currency_code: 'EUR',
    });
    const orderId = created.result.order_id;
    observed.order_id = orderId;
    check(orderId !== '', 'CreateOrder returned no order_id');
    check(created.result.version === '1', `CreateOrder version ${created.result.version}, expected 1`);

    // 2. Add 2 units at 150 minor units (1.50 EUR) each.
    const added = await call(commands, 'AddItem', {
      order_id: orderId,
      sku: 'NODE-SKU-1',
      name: 'Node client check item',
      quantity: 2,
      unit_price: { currency_code: 'EUR', minor_units: 150 },
    });
    check(added.result.version === '2', `AddItem version ${added.result.version}, expected 2`);
    check(added.result.consistency_token !== '', 'AddItem returned no consistency_token');

    // 3. Read our own write: with the token, the read service waits until its
    //    views include the AddItem before answering.
    const read = await call(queries, 'GetOrder', {
      order_id: orderId,
      consistency_token: added.result.consistency_token,
    });
    const order = read.order;
    observed.version = Number(order.version);
    observed.status = order.status;
    observed.total = { currency_code: order.total.currency_code, minor_units: Number(order.total.minor_units) };
    observed.stale = read.consistency.stale;
    check(read.consistency.stale === false, 'GetOrder answer is stale despite the consistency token');
    check(order.order_id === orderId, `GetOrder returned order ${order.order_id}, expected ${orderId}`);
    check(order.version === '2', `order version ${order.version}, expected 2`);
    check(order.status === 'ORDER_STATUS_PENDING', `order status ${order.status}, expected ORDER_STATUS_PENDING`);
    check(
      order.total.currency_code === 'EUR' && order.total.minor_units === '300',
      `order total ${JSON.stringify(order.total)}, expected 300 EUR minor units`,
    );
    check(
      order.items.length === 1 && order.items[0].quantity === 2,
      `order items ${JSON.stringify(order.items)}, expected one line of quantity 2`,
    );

    // 4. An invalid currency must fail with INVALID_ARGUMENT and the rich status.
    let rejection = null;
    try {
      await call(commands, 'CreateOrder', { customer_id: 'node-client', currency_code: 'euro' });
    } catch (error) {
      rejection = error;
    }
    check(rejection !== null, 'CreateOrder with currency_code "euro" succeeded, expected INVALID_ARGUMENT');
    observed.error_code = codeName(rejection.code);
    check(
      rejection.code === grpc.status.INVALID_ARGUMENT,
      `CreateOrder with currency_code "euro" failed with ${observed.error_code}: ${rejection.details}`,
    );
    const detailsBin = rejection.metadata ? rejection.metadata.get('grpc-status-details-bin') : [];
    observed.status_details_trailer = detailsBin.length > 0;
    check(detailsBin.length > 0, 'INVALID_ARGUMENT carries no grpc-status-details-bin trailer');
    const details = decodeStatusDetails(detailsBin[0]);
    observed.status_details = details;
    check(details.code === grpc.status.INVALID_ARGUMENT, `status details code ${details.code}, expected 3`);
    check(
      details.field_violations.includes('currency_code'),
      `status details name fields ${JSON.stringify(details.field_violations)}, expected currency_code`,
    );
  } finally {
    commands.close();
    queries.close();
  }
}

async function main() {
  const [writeAddress, readAddress] = process.argv.slice(2);
  if (!writeAddress || !readAddress) {
    console.error('usage: node create_and_read.js WRITE_ADDRESS READ_ADDRESS  (e.g. 127.0.0.1:50051 127.0.0.1:50052)');
    return 2;
  }
  const observed = {};
  try {
    await run(loadOrdersApi(), writeAddress, readAddress, observed);
  } catch (error) {
    // A failed check, or an RPC that failed unexpectedly (then with its gRPC code).
    // gRPC errors' messages already start with the code ("14 UNAVAILABLE: ...");
    // anything else is a bug in this program, so show where it happened.
    const isExpected = error instanceof CheckFailed || error.code !== undefined;
    console.error(`FAILED: ${isExpected ? error.message : error.stack}`);
    console.error(`observed so far: ${JSON.stringify(observed)}`);
    return 1;
  }
  console.log(JSON.stringify(observed));
  return 0;
}

main().then((code) => {
  process.exitCode = code;
});
