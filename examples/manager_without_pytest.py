"""The IsolationManager needs no pytest: create environments from any script.

python examples/manager_without_pytest.py
"""

from __future__ import annotations

from pytest_isolation import IsolationManager


def main() -> None:
    with IsolationManager() as manager:
        env = manager.create("virtualenv")
        result = env.run(["python", "-c", "import sys; print(sys.prefix)"]).check()
        print(f"environment {env.id}: python at {env.path}, prefix {result.stdout.strip()}")
        print(f"set-up took {env.usage().setup_duration * 1000:.1f} ms")
    print("torn down: nothing is left behind")


if __name__ == "__main__":
    main()
