from sdtrain.cli import main

main()
