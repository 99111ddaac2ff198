from routecache.replay.server import main

raise SystemExit(main())
