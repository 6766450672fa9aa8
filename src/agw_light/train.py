"""`python -m agw_light.train`: the command lives in `agw_light.cli.train`."""

from agw_light.cli.train import main

if __name__ == "__main__":
    main()
