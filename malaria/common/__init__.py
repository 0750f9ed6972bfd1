"""What every layer uses: the user's errors and how verbs report them (`errors`), atomic writes
(`atomic`), flag ranges (`flags`), the silencing of Lightning's noise (`quiet`), the precision and
peak the hardware computes at (`hardware`), and bounded retries of network calls (`retry`)."""
