from selfhost.cli.main import main

main()
