from torchshrink.cli import main

main()
