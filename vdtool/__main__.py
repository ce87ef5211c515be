from vdtool.cli import main

main()
