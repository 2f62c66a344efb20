from prefixtune.cli import main

main()
