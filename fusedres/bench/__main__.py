from fusedres.bench.cli import main

main()
