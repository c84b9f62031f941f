"""`vimpac tokenize`: a video collection -> a resumable token store (see `job`)."""
