from mmlib.cli import main

main(prog_name="mm")
