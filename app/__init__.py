"""The MoRA Studio web app and command line."""
