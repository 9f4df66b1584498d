from mp4sr_cli import main

main()
