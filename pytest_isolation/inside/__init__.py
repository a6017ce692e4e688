"""Running a test's own body inside its environment, observed exactly as in-process.

The pytest-xdist model, on one event channel: a worker where the environment is
runs pytest's whole ``pytest_runtest_protocol`` hook chain and relays every
event (:mod:`.worker`); the runner fires them again and turns a worker that
dies, hangs or is killed into the report the user would have had
(:mod:`.controller`); the events travel as frames of plain data that never fail
to encode (:mod:`.channel`).  The transport for the sandbox is a fork.
"""
