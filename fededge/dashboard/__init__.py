"""The live dashboard of a federation: a web page over the server's store (torch-free)."""
