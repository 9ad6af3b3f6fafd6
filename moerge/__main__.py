"""``python -m moerge`` (also used by ``accelerate launch -m moerge``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
