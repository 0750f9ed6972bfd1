"""What every layer uses: the user's errors and how verbs report them, atomic writes, flag ranges,
and the silencing of Lightning's noise."""
