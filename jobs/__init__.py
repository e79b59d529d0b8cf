"""The application: the `scriptorium` command line and what its commands run (a job, a submission, a
summary, a report, an inspection)."""
