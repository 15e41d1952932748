from uniseg_monai.cli import main

main()
