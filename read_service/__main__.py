from read_service.main import main

main()
