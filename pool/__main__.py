from pool.cli import main

main()
