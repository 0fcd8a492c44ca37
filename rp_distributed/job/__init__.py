"""The driver: the plan, one run per output prefix (the lease), the stages declared and wired into Ray Data, the
manifest streamed as rows arrive, the progress bar."""
