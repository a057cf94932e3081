from edgec.app.cli import main

main()
