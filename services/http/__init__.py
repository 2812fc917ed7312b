"""What every request passes: the fast front, admission, limits, timeouts, timing headers, errors."""
