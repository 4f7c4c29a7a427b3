from orders_bench.main import main

if __name__ == "__main__":  # a spawned client process imports this module too, and must not run it
    main()
