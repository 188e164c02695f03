from preftune.cli import main

raise SystemExit(main())
