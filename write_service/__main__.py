from write_service.main import main

main()
