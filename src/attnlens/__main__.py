from attnlens.faces.cli import main

raise SystemExit(main())
