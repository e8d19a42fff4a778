from mmlib.cli import main

main()
