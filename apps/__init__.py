"""What deploys to a cluster (controller, node daemon, webhook, and what they share in
:mod:`apps.common`) plus the ``chscale`` CLI. Nothing imports apps except the CLI's own
modules, the test bench and tests; the deployed components never import the test bench."""
