"""`python -m clipviz …`, which is also what `torchrun … -m clipviz train …` runs."""

from clipviz.cli import main

if __name__ == "__main__":
    main()
