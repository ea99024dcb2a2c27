"""The Admin tab, in the web process: login, data, training, jobs, served models, Hub; never imports torch."""
