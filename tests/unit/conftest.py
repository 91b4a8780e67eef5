"""Unit tier: pure Python. Models, the CRD generator, admission and the CLI run in-process;
nothing starts a process or opens a socket."""
