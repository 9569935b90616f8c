from attnlens.cli import main

raise SystemExit(main())
