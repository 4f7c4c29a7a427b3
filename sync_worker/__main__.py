from sync_worker.main import main

main()
