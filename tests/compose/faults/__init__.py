"""Accepted work is done when things fail: faults on the real compose stack.

One stack (its own compose project, three cpu workers) with short timeouts
(``FAULTS`` in stack.py), so that kombu hands back the unacknowledged tasks of a
dead or cut-off worker within a minute or two instead of an hour. It is started
once for the package (conftest.py); the scenarios, a module each, run on it one
after the other in their numbered order. Each leaves every cpu worker running
and healthy, asserts, and records a row of the reliability report (report.py;
``scripts/reliability.py`` regenerates it).

Duplicates are counted by the work itself: work.py records every run of every
item in Redis (trace.py reads them back).
"""
