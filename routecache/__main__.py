from routecache.router.cli import main

raise SystemExit(main())
