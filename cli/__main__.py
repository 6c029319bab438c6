"""``python -m kdcache.cli`` (what ``torchrun -m kdcache.cli`` runs)."""

from kdcache.cli.app import main

if __name__ == "__main__":
    main()
