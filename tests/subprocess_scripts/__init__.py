"""Scripts the tests run in fresh Python processes, and the modules such a process loads by name."""
