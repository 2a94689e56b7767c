from advplug.tools.cli import main

main()
