"""focalnet-pl command line: fit / validate / test / predict with YAML configs (see README)."""
from focalnet_pl.cli import main

if __name__ == "__main__":
    main()
