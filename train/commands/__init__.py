"""The command line of ``python -m train``: one module per subcommand, each with ``register(subparsers)`` and
``run(args)``; nothing in the library imports them."""
