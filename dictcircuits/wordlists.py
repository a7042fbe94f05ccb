"""Word lists shared by the task generators and the embedded default's training corpus, so that every name,
place and object a task uses is a single token for the default model's tokenizer."""

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
