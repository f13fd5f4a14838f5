"""The front ends (the command line's modes, the web app) and the engine they share
(``runners.engine``). Importing this package imports none of them."""
