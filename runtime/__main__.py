from runtime.server import main

main()
