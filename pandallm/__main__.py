from pandallm.cli import main

main()
