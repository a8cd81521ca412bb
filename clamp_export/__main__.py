from clamp_export.cli import main

main()
