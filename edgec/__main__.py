from edgec.cli import main

main()
