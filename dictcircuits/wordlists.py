"""Word lists shared by the task generators and the embedded default's training corpus: every name, place, object and
noun in the base lists is a single token for the default model's tokenizer; EXTRA_ lists top pools up for others."""

NAMES = (
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Michael", "Anna", "Paul",
    "Kate", "Mark", "Lucy", "Peter", "Jane", "Tom", "Rose", "Sam", "Grace", "Jack", "Ruth", "Adam", "Amy",
    "Dan", "Claire", "Ben", "Helen", "Joe", "Nora", "Max", "Ella", "Luke", "Jess", "Carl", "Maria", "Ryan",
    "Beth", "Eric", "Lisa", "Frank", "Julia", "Kevin", "Tina", "Scott", "Diana", "Henry", "Olivia", "Ian",
)
# names the default model never sees in IOI-style training stories: evaluation on them measures generalisation
HELDOUT_NAMES = ("Olivia", "Ian", "Diana", "Henry", "Tina", "Scott")

PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "library",
          "market", "beach")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "letter",
           "gift", "cake")

# subject-verb agreement: (singular noun, plural noun)
NOUNS = (("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("author", "authors"),
         ("pilot", "pilots"), ("student", "students"), ("singer", "singers"), ("officer", "officers"),
         ("lawyer", "lawyers"), ("senator", "senators"), ("manager", "managers"), ("painter", "painters"))
# (singular verb, plural verb)
VERBS = ((" is", " are"), (" was", " were"), (" has", " have"))
PREP_NOUNS = ("desk", "door", "car", "tree", "house", "window", "table", "bridge")
RC_VERBS = ("likes", "saw", "met", "knows", "helped")

# --- extension pools ---------------------------------------------------------------------------------------------
# A generator keeps the words of a base list above that are single tokens for the tokenizer at hand (with their
# leading space) and tops the pool up to the base list's size from the matching EXTRA_ list, in order. dc-mini's
# tokenizer has every base word as one token, so its prompts are exactly those it was trained on; other tokenizers
# (GPT-2, Llama/SmolLM, Gemma) swap the few base words they split for extra ones. No name here is part of another.
EXTRA_NAMES = (
    "George", "Thomas", "William", "Robert", "Richard", "Charles", "Joseph", "Matthew", "Andrew", "Steven",
    "Brian", "Edward", "Jason", "Jeff", "Gary", "Tim", "Larry", "Justin", "Patrick", "Jerry", "Dennis", "Walter",
    "Arthur", "Harry", "Albert", "Roger", "Louis", "Gordon", "Martin", "Tony", "Chris", "Nick", "Jim", "Bill",
    "Jacob", "Nathan", "Kyle", "Emily", "Jennifer", "Linda", "Susan", "Karen", "Nancy", "Betty", "Sandra",
    "Donna", "Carol", "Sharon", "Michelle", "Angela", "Melissa", "Rebecca", "Amanda", "Nicole", "Victoria",
    "Catherine", "Martha", "Alex", "Leo", "Oscar", "Hannah", "Sophie", "Chloe", "Zoe", "Ethan", "Noah", "Liam",
)
# top-ups for HELDOUT_NAMES, disjoint from NAMES and EXTRA_NAMES
EXTRA_HELDOUT_NAMES = (
    "Rachel", "Megan", "Kelly", "Jordan", "Sean", "Simon", "Philip", "Keith", "Craig", "Wayne", "Neil", "Greg",
    "Holly", "Molly", "Fiona", "Gloria", "Irene", "Vincent", "Howard", "Monica",
)
EXTRA_PLACES = ("museum", "church", "farm", "airport", "hotel", "bank", "cafe", "zoo", "theater", "bakery", "shop",
                "river", "lake", "castle", "mall", "gym", "kitchen", "forest", "harbor", "village", "city", "hall")
# consonant-initial, since the templates say "a {OBJECT}"
EXTRA_OBJECTS = ("ball", "box", "bag", "hat", "pen", "cup", "card", "key", "map", "toy", "phone", "watch", "coin",
                 "flower", "shirt", "lamp", "chair", "plant", "cookie", "sandwich", "ticket", "picture", "bottle",
                 "camera", "guitar", "candle", "pizza")
EXTRA_NOUNS = (("nurse", "nurses"), ("driver", "drivers"), ("writer", "writers"), ("player", "players"),
               ("worker", "workers"), ("leader", "leaders"), ("soldier", "soldiers"), ("friend", "friends"),
               ("guard", "guards"), ("judge", "judges"), ("chef", "chefs"), ("actor", "actors"),
               ("artist", "artists"), ("engineer", "engineers"), ("customer", "customers"),
               ("scientist", "scientists"), ("dancer", "dancers"), ("reporter", "reporters"), ("baker", "bakers"),
               ("captain", "captains"), ("coach", "coaches"), ("neighbor", "neighbors"), ("parent", "parents"))
EXTRA_PREP_NOUNS = ("wall", "road", "lamp", "chair", "fence", "gate", "river", "building", "shop", "garden",
                    "bench", "tower")
EXTRA_RC_VERBS = ("loves", "hates", "sees", "trusts", "called", "visited", "admired", "thanked", "hired", "found")
# greater-than: "The {EVENT} lasted from the year ..."
EVENTS = ("war", "expedition", "drought", "project", "dynasty", "trial")
EXTRA_EVENTS = ("siege", "famine", "reign", "journey", "voyage", "strike", "festival", "campaign", "conflict",
                "program", "flood", "boom")
