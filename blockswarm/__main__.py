from blockswarm.cli import main

main()
