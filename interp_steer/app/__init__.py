"""The application: the command line, one function per command, the study."""
