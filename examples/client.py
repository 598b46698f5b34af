"""A Loco Sync client in stdlib Python. Run: python examples/client.py http://127.0.0.1:5000 TOKEN"""
import http.client, json, sys, time, urllib.error, urllib.parse, urllib.request


def get(base, path, headers):
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=60) as answer:
        return json.load(answer)


def sync(base, headers):
    """Yields the store, {modelName: {id: row}}, after each answer. Reads `headers` anew each time."""
    cursor = None
    while True:
        try:
            if cursor is None:  # eager bootstrap: every row of my sync groups, as of firstSyncId
                answer = get(base, "/bootstrap?type=eager&models=Author,Group,Todo", headers)
                store = {model: {row["id"]: row for row in rows} for model, rows in answer["bootstrap"].items()}
                cursor, groups = answer["firstSyncId"], set(answer["syncGroups"])
                yield store
            page = get(base, f"/sync?since={cursor}&wait=25", headers)  # held until there is news
            for action in page["sync"]:  # in syncId order; insert and update carry the whole row
                if action["action"] == "delete":
                    store[action["modelName"]].pop(action["modelId"], None)
                else:
                    store[action["modelName"]][action["modelId"]] = action["data"]
            for group in groups - set(page["syncGroups"]):  # a group I left: drop its rows
                store["Group"].pop(group.removeprefix("group:"), None)
                store["Todo"] = {id: row for id, row in store["Todo"].items() if f"group:{row['groupId']}" != group}
            for group in set(page["syncGroups"]) - groups:  # a group I joined: load its rows
                query = urllib.parse.urlencode({"type": "lazy", "models": "Group,Todo", "syncGroups": group})
                for model, rows in get(base, f"/bootstrap?{query}", headers)["bootstrap"].items():
                    store[model].update({row["id"]: row for row in rows})
            # Those rows are as of a later syncId; the next pages re-apply whole rows up to it, in order.
            cursor, groups = page["lastSyncId"], set(page["syncGroups"])  # after hasMore, it answers at once
            yield store
        except urllib.error.HTTPError as error:
            try:
                refusal = json.load(error)["error"]
            except ValueError:  # not our answer (a proxy's 502): a network error
                refusal = {"type": "network", "code": None}
            if refusal["code"] == "bootstrap_again":
                cursor = None  # reset, compacted, or new models: start again
            elif refusal["type"] == "server":
                raise
            else:
                time.sleep(1)  # auth or network: retry, as Loco Sync does
        except (OSError, http.client.HTTPException, ValueError):  # no answer, or cut short: retry
            time.sleep(1)


if __name__ == "__main__":
    for store in sync(sys.argv[1], {"Authorization": f"Bearer {sys.argv[2]}"}):
        print(json.dumps(store), flush=True)
