"""featcache's command line: a thin click layer over the featcache library."""
