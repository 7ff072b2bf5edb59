"""``python -m megadmd`` and ``deepspeed --module megadmd``: the same CLI as the console script."""
from .cli import main

main()
